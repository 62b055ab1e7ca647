//! Integration tests: drive the built `nixcache` binary against real Nix.
//!
//! Every test that needs Nix fails (never skips) when Nix is missing: `.ci/run` installs it.
//! Restores go into throwaway chroot stores under each test's temp dir, with
//! `require-sigs = true`, so nothing depends on the host's daemon or trust settings.

mod errors;
mod examples;
mod habits;
mod helpers;
mod http;
mod keys;
mod layers;
mod maintenance;
mod newcomer;
mod partial;
mod push;
mod remote;
mod s3;
mod serve;
mod serve_hostile;
mod trust;
mod upload;
