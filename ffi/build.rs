//! Links librbd and librados (the C libraries the bindings call).

fn main() {
    println!("cargo:rustc-link-lib=rbd");
    println!("cargo:rustc-link-lib=rados");
}
