//! This host's subnet lease and membership: the API the daemon uses.
//!
//! The parts live in modules of their own — [`crate::keeper`] holds the lease,
//! [`crate::watch`] follows the peers, [`crate::membership`] runs both — and are gathered here
//! under the names weftd and its tests use.

pub use crate::backoff::{Backoff, Delays};
pub use crate::keeper::{
    Settings, SettingsError, DEFAULT_LEASE_TTL, DEFAULT_RACE_ATTEMPTS, DEFAULT_RENEW_MARGIN,
    DEFAULT_RENEW_RETRY,
};
pub use crate::membership::{run_membership, wait_for_config, MembershipError, MembershipHandle};
pub use crate::own_lease::Lease;
