# One path of a large sparse file (zeros, no disk) and a little random: above the size from
# which zstd compresses on several threads. Build: nix-build tests/sparse.nix --no-out-link
{ salt ? "0", mib ? 300 }:
derivation {
  name = "edge-sparse";
  inherit salt;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = [ "-c" "mkdir $out && truncate -s ${toString mib}M $out/sparse && head -c 3000000 /dev/urandom > $out/random" ];
}
