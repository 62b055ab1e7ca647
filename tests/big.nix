# One store path whose NAR is several xz blocks (24 MiB each at level 6), for the tests of
# the block pipeline. Quick to compress: mostly zeros and counting, some random bytes.
# Build: nix-build tests/big.nix --no-out-link [--argstr salt X]
{ salt ? "0" }:
derivation {
  name = "edge-big";
  inherit salt;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = [ "-c" ''
    mkdir -p $out/many && cd $out
    head -c 30000000 /dev/zero > a-zeros
    head -c 1500000 /dev/urandom > b-random
    seq 1 2000000 > c-numbers
    i=0
    while [ $i -lt 300 ]; do echo "file $i" > many/f$i; ln -s f$i many/l$i; i=$((i+1)); done
    printf '#!/bin/sh\necho big\n' > d-exe && chmod +x d-exe
    head -c 20000000 /dev/zero | tr '\0' 'x' > e-xs
    echo $out > self-ref
  '' ];
}
