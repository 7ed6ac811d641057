//! Frontend benches: parsing and planning.
fn main() {}
