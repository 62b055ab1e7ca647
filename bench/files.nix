# One store path of many small files (default 200,000, in two directories), several xz
# blocks of NAR: the case where each block must not walk the whole tree again.
#   nix-build bench/files.nix --no-out-link --arg n 200000
{ n ? 200000 }:
derivation {
  name = "many-files-${toString n}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = [ "-c" ''
    half=$((${toString n} / 2))
    mkdir -p $out/a $out/b
    seq 1 $((half * 10)) | split -l 10 -a 5 - $out/a/f
    seq $((half * 10 + 1)) $((half * 20)) | split -l 10 -a 5 - $out/b/f
  '' ];
}
