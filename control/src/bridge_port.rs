//! weft's multicast TAP as a port of the container bridge.
//!
//! The engine creates the TAP (`--multicast-tap`, `weftmc0`); this keeps it enslaved to the
//! container bridge (`--multicast-bridge`, docker0 by default), up, and marked as a permanent
//! multicast router port (`bridge link set dev weftmc0 mcast_router 2`: the bridge floods it
//! every group and every IGMP report, snooping or not). docker creates its bridge after weftd
//! starts, and may delete and create it again: the port is checked every second and put right
//! whenever it is not as it should be. All of it over rtnetlink.

use std::time::Duration;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{
    BridgeMulticastRouterType, InfoBridgePort, InfoPortData, InfoPortKind, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::LinkUnspec;
use tracing::{debug, info, warn};

use crate::netlink::{nl_err, NetconfError, Netlink};

/// How often the port is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// What the kernel says about one interface, as far as the port is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortState {
    /// Its index.
    pub index: u32,
    /// The index of its master (bridge), if any.
    pub master: Option<u32>,
    /// Whether it is administratively up.
    pub up: bool,
    /// Its bridge-port multicast router setting, if it is a bridge port.
    pub multicast_router: Option<BridgeMulticastRouterType>,
}

/// What to do to make the TAP a proper port of the bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortAction {
    /// The bridge or the TAP does not exist (yet): wait.
    Wait,
    /// Nothing: the port is as it should be.
    Nothing,
    /// Enslave the TAP to the bridge at this index, bring it up and set the router flag.
    Attach {
        /// The TAP's index.
        tap: u32,
        /// The bridge's index.
        bridge: u32,
    },
    /// The TAP is on the bridge; bring it up and set the router flag.
    Fix {
        /// The TAP's index.
        tap: u32,
    },
}

/// Decide what the port needs, from the bridge's index and the TAP's state.
pub fn port_action(bridge: Option<u32>, tap: Option<PortState>) -> PortAction {
    let (Some(bridge), Some(tap)) = (bridge, tap) else {
        return PortAction::Wait;
    };
    if tap.master != Some(bridge) {
        return PortAction::Attach {
            tap: tap.index,
            bridge,
        };
    }
    if tap.up && tap.multicast_router == Some(BridgeMulticastRouterType::Permanent) {
        PortAction::Nothing
    } else {
        PortAction::Fix { tap: tap.index }
    }
}

fn port_state(msg: &LinkMessage) -> PortState {
    let mut state = PortState {
        index: msg.header.index,
        master: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        multicast_router: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::Controller(index) => state.master = Some(*index),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::PortData(InfoPortData::BridgePort(opts)) = info {
                        for opt in opts {
                            if let InfoBridgePort::MulticastRouter(kind) = opt {
                                state.multicast_router = Some(*kind);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    state
}

fn name_of(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

/// The bridge's index and the TAP's state, as the kernel has them now.
async fn look(
    netlink: &Netlink,
    bridge: &str,
    tap: &str,
) -> Result<(Option<u32>, Option<PortState>), NetconfError> {
    let mut stream = netlink.handle().link().get().execute();
    let (mut bridge_index, mut tap_state) = (None, None);
    while let Some(msg) = stream.try_next().await.map_err(nl_err("list links"))? {
        match name_of(&msg) {
            Some(name) if name == bridge => bridge_index = Some(msg.header.index),
            Some(name) if name == tap => tap_state = Some(port_state(&msg)),
            _ => {}
        }
    }
    Ok((bridge_index, tap_state))
}

async fn set(netlink: &Netlink, msg: LinkMessage, what: &'static str) -> Result<(), NetconfError> {
    netlink
        .handle()
        .link()
        .set(msg)
        .execute()
        .await
        .map_err(nl_err(what))
}

/// Make the TAP a multicast router port of the bridge, once: what was done.
pub async fn attach_once(
    netlink: &Netlink,
    bridge: &str,
    tap: &str,
) -> Result<PortAction, NetconfError> {
    let (bridge_index, tap_state) = look(netlink, bridge, tap).await?;
    let action = port_action(bridge_index, tap_state);
    let tap_index = match action {
        PortAction::Wait | PortAction::Nothing => return Ok(action),
        PortAction::Attach { tap, bridge } => {
            set(
                netlink,
                LinkUnspec::new_with_index(tap).controller(bridge).build(),
                "enslave the multicast TAP to the bridge",
            )
            .await?;
            tap
        }
        PortAction::Fix { tap } => tap,
    };
    set(
        netlink,
        LinkUnspec::new_with_index(tap_index)
            .set_port_kind(InfoPortKind::Bridge)
            .set_port_data(InfoPortData::BridgePort(vec![
                InfoBridgePort::MulticastRouter(BridgeMulticastRouterType::Permanent),
            ]))
            .build(),
        "mark the multicast TAP as a multicast router port",
    )
    .await?;
    set(
        netlink,
        LinkUnspec::new_with_index(tap_index).up().build(),
        "bring the multicast TAP up",
    )
    .await?;
    Ok(action)
}

/// Keep the TAP on the bridge forever (run it as a task; abort it to stop).
pub async fn keep_attached(netlink: Netlink, bridge: String, tap: String) {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut waiting_logged = false;
    let mut failing = false;
    loop {
        tick.tick().await;
        match attach_once(&netlink, &bridge, &tap).await {
            Ok(PortAction::Wait) => {
                if !waiting_logged {
                    info!(%bridge, %tap, "waiting for the container bridge to carry multicast through it");
                    waiting_logged = true;
                }
            }
            Ok(PortAction::Nothing) => failing = false,
            Ok(done) => {
                info!(%bridge, %tap, ?done, "multicast TAP is a multicast router port of the container bridge");
                waiting_logged = false;
                failing = false;
            }
            Err(e) if !failing => {
                warn!(%bridge, %tap, "cannot put the multicast TAP on the bridge: {e}; retrying every {CHECK_INTERVAL:?}");
                failing = true;
            }
            Err(e) => {
                debug!(%bridge, %tap, "still cannot put the multicast TAP on the bridge: {e}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tap(master: Option<u32>, up: bool, router: Option<BridgeMulticastRouterType>) -> PortState {
        PortState {
            index: 9,
            master,
            up,
            multicast_router: router,
        }
    }

    #[test]
    fn the_port_is_attached_once_both_exist_and_again_after_a_new_bridge() {
        use BridgeMulticastRouterType::{Permanent, TempQuery};
        assert_eq!(
            port_action(None, Some(tap(None, false, None))),
            PortAction::Wait
        );
        assert_eq!(port_action(Some(3), None), PortAction::Wait);
        assert_eq!(
            port_action(Some(3), Some(tap(None, false, None))),
            PortAction::Attach { tap: 9, bridge: 3 }
        );
        // docker deleted and created its bridge again: a new index.
        assert_eq!(
            port_action(Some(4), Some(tap(Some(3), true, Some(Permanent)))),
            PortAction::Attach { tap: 9, bridge: 4 }
        );
        assert_eq!(
            port_action(Some(3), Some(tap(Some(3), true, Some(TempQuery)))),
            PortAction::Fix { tap: 9 }
        );
        assert_eq!(
            port_action(Some(3), Some(tap(Some(3), false, Some(Permanent)))),
            PortAction::Fix { tap: 9 }
        );
        assert_eq!(
            port_action(Some(3), Some(tap(Some(3), true, Some(Permanent)))),
            PortAction::Nothing
        );
    }
}
