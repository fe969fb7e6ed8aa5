//! zbroker's one change to zmq-sys 0.12.0: how libzmq is built.
//!
//! Published zmq-sys compiles libzmq 4.3.4 (the `zeromq-src` crate) without
//! the DRAFT API and without CURVE. zbroker needs both:
//!
//! - the DRAFT socket options `ZMQ_IN_BATCH_SIZE` / `ZMQ_OUT_BATCH_SIZE`,
//!   which set how many bytes libzmq moves per `recv()`/`send()` system call
//!   (8 KiB when unset; see BENCHMARKS.md for what larger batches buy);
//! - CURVE encryption and authentication, which libzmq only offers when it
//!   is linked with libsodium. We link the system's static libsodium, found
//!   through pkg-config (Debian: `libsodium-dev`), rather than libzmq's
//!   unaudited tweetnacl fallback.
//!
//! The DRAFT API adds sockets and options; it changes none of the stable
//! API's behaviour.

fn main() {
    println!("cargo:rerun-if-changed=build/main.rs");
    println!("cargo:rerun-if-env-changed=PROFILE");
    // zbroker's libzmq sources (vendor/zeromq-src): a change there must
    // rebuild libzmq. The line above would otherwise limit reruns to this
    // file, and cargo would keep linking a stale libzmq.
    println!("cargo:rerun-if-changed=../zeromq-src/vendor/src");
    println!("cargo:rerun-if-changed=../zeromq-src/vendor/include");

    let sodium = match pkg_config::Config::new()
        .statik(true)
        .cargo_metadata(false)
        .probe("libsodium")
    {
        Ok(sodium) => sodium,
        Err(e) => panic!(
            "libzmq is built with CURVE, which needs libsodium and pkg-config \
             (Debian: `apt-get install libsodium-dev pkg-config`, or run \
             scripts/deps): {}",
            e
        ),
    };
    let lib_dir = match sodium.link_paths.first() {
        Some(dir) => dir.clone(),
        None => panic!(
            "pkg-config names no library directory for libsodium; set \
             PKG_CONFIG_PATH to a libsodium.pc that does"
        ),
    };
    let include_dir = sodium
        .include_paths
        .first()
        .cloned()
        .unwrap_or_else(|| "/usr/include".into());

    zeromq_src::Build::new()
        .enable_draft(true)
        .with_libsodium(Some(zeromq_src::LibLocation::new(
            lib_dir.clone(),
            include_dir,
        )))
        .build();
    // zeromq-src prints libsodium's search path quoted (`{:?}`), which rustc
    // does not understand, so it is printed again here. After the build, so
    // that the directory of the libzmq just built comes first: the system
    // directory may hold another libzmq.a (Debian's libzmq3-dev, no DRAFT).
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
}
