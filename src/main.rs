//! The `tsdistill` command line.
fn main() {
    println!("tsdistill");
}
