//! Build script. The CUDA kernels under `kernels/` are compiled here (see the kernels issue); for now it only
//! tells cargo what to watch so that later kernel builds are incremental.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}
