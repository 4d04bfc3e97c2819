//! Ports for the system a benchmark starts: shared by the benchmarks of
//! several crates (each includes this file with `#[path]`, as `proc.rs`).

/// A gateway port with the five after it free (the launcher's internal
/// ports), picked at random between 20000 and 50000, below the ephemeral
/// range.
pub fn free_port_block() -> u16 {
    for _ in 0..100 {
        let base = 20000 + (uuid::Uuid::new_v4().as_u128() % 30000) as u16;
        if (0..6).all(|n| std::net::TcpListener::bind(("127.0.0.1", base + n)).is_ok()) {
            return base;
        }
    }
    panic!("no free block of ports");
}
