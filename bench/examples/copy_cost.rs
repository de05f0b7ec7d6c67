//! What one 64 KiB `memcpy` costs on this machine, with cold caches and warm.
//!
//! A TUN/UDP engine copies every byte four times that the kernel's VXLAN never copies (TUN read,
//! UDP send, UDP receive, TUN write), so four cold 64 KiB copies added to VXLAN's CPU cost per
//! 64 KiB is the floor of such an engine's cost (docs/performance.md). `lab.sh bench` runs this
//! once per invocation and reports that floor.
//!
//! Cold: each copy reads and writes a 64 KiB chunk of two 256 MiB buffers (far larger than any
//! cache of the machine), the chunks taken in a shuffled order so that no copy finds its data
//! in a cache. Warm: the same 64 KiB copied again and again.
//!
//! Prints one JSON object: `{"bytes": 65536, "cold_us": .., "warm_us": .., ...}` (medians over
//! the passes, and their min and max).
//!
//! Usage: copy_cost [--passes N]   (default 7)

use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

const CHUNK: usize = 64 * 1024;
const POOL: usize = 256 * 1024 * 1024;
const CHUNKS: usize = POOL / CHUNK;
const WARM_COPIES: usize = 4096;

fn main() -> ExitCode {
    let passes = match passes_from_args() {
        Ok(p) => p,
        Err(message) => {
            eprintln!("copy_cost: {message}");
            return ExitCode::from(2);
        }
    };
    // Filled with non-zero bytes so that every page is really allocated before timing.
    let src = vec![0x5au8; POOL];
    let mut dst = vec![0xa5u8; POOL];
    let order = shuffled(CHUNKS, 0x9e37_79b9_7f4a_7c15);

    let mut cold = Vec::with_capacity(passes);
    let mut warm = Vec::with_capacity(passes);
    for _ in 0..passes {
        let start = Instant::now();
        for &i in &order {
            let at = i * CHUNK;
            dst[at..at + CHUNK].copy_from_slice(black_box(&src[at..at + CHUNK]));
        }
        black_box(&dst);
        cold.push(start.elapsed().as_secs_f64() * 1e6 / CHUNKS as f64);

        let (one_src, one_dst) = (&src[..CHUNK], &mut dst[..CHUNK]);
        let start = Instant::now();
        for _ in 0..WARM_COPIES {
            one_dst.copy_from_slice(black_box(one_src));
            black_box(&one_dst);
        }
        warm.push(start.elapsed().as_secs_f64() * 1e6 / WARM_COPIES as f64);
    }
    let (cold, warm) = (Stats::of(cold), Stats::of(warm));
    println!(
        "{{\"bytes\": {CHUNK}, \"passes\": {passes}, \"cold_us\": {:.4}, \"cold_min_us\": {:.4}, \
         \"cold_max_us\": {:.4}, \"warm_us\": {:.4}, \"warm_min_us\": {:.4}, \"warm_max_us\": {:.4}}}",
        cold.median, cold.min, cold.max, warm.median, warm.min, warm.max
    );
    ExitCode::SUCCESS
}

fn passes_from_args() -> Result<usize, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(7),
        [flag, n] if flag == "--passes" => match n.parse::<usize>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("--passes needs a positive integer, not {n:?}")),
        },
        _ => Err("usage: copy_cost [--passes N]".to_string()),
    }
}

/// 0..n in an order fixed by `seed` (xorshift64 driving a Fisher-Yates shuffle).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = seed;
    for i in (1..n).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let j = (state % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn of(mut values: Vec<f64>) -> Stats {
        values.sort_by(f64::total_cmp);
        Stats {
            median: values[values.len() / 2],
            min: values[0],
            max: values[values.len() - 1],
        }
    }
}
