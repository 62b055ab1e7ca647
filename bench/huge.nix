# One path where a single NAR dominates: a 5 GiB sparse file (zeros, no disk) and 50 MB of
# random bytes. Build: nix-build bench/huge.nix --no-out-link
{ gib ? 5 }:
derivation {
  name = "huge-path";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = [ "-c" "mkdir $out && truncate -s ${toString gib}G $out/sparse && head -c 50000000 /dev/urandom > $out/random" ];
}
