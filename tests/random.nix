# One store path of random bytes: a full xz block (24 MiB at level 6) that LZMA2 cannot
# shrink, which liblzma's multithreaded encoder stores uncompressed, and a short last block.
# Build: nix-build tests/random.nix --no-out-link [--argstr salt X]
{ salt ? "0" }:
derivation {
  name = "edge-random";
  inherit salt;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = [ "-c" "head -c 27000000 /dev/urandom > $out" ];
}
