# A closure half of which an upstream cache serves, for the partial-cache tests: `upstream`
# (up-tool and up-libc) is pushed to an upstream cache and substituted back from it, then
# `app` and `app-with-secret` are built on top of it locally.
# Build: nix-build tests/partial.nix -A upstream --no-out-link --argstr salt X
{ salt ? "0" }:
let
  mk = name: script: derivation {
    inherit name salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" script ];
  };
  libc = mk "up-libc" "mkdir $out; head -c 300000 /dev/urandom > $out/libc.so";
  tool = mk "up-tool" "mkdir $out; echo ${libc} > $out/needs; head -c 200000 /dev/urandom > $out/tool";
  local = mk "local-dep" "mkdir $out; echo local > $out/file";
  secret = mk "secret-token" "echo hunter2 > $out";
  app = mk "app" "mkdir $out; echo ${tool} ${libc} ${local} > $out/refs";
  withSecret = mk "app-with-secret" "mkdir $out; echo ${app} ${secret} > $out/refs";
in { upstream = tool; inherit app withSecret; }
