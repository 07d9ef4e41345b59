//! The tcmu-rbd daemon.

fn main() {
    std::process::exit(tcmu_rbd::daemon_main::run(std::env::args().collect()));
}
