//! Write the seed corpus: `cargo run --manifest-path fuzz/Cargo.toml --example seeds`.
//! Seeds go to `fuzz/seeds/<target>/`, which is checked in.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for (target, seeds) in [
        ("packet", weft_fuzz::packet_seeds()),
        ("decide", weft_fuzz::decide_seeds()),
    ] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes)?;
        }
        println!("{}", dir.display());
    }
    Ok(())
}
