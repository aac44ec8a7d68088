//! Sets an rpath to the libtorch that torch-sys linked against, so `cargo run` and
//! `cargo test` binaries start without LD_LIBRARY_PATH. A deployed binary can still be
//! pointed at another libtorch 2.11 (e.g. a CUDA one) with LD_LIBRARY_PATH, which the
//! dynamic loader searches before a DT_RUNPATH.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
        println!("cargo:rustc-env=DLSR_BUILD_LIBTORCH_LIB={lib_dir}");
    }
}
