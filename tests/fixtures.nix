# Store paths that cover the NAR edge cases, for the integration tests.
# Build: nix-build tests/fixtures.nix --no-out-link [--argstr salt X]
# Needs only nix-bin with sandbox = false: builders use /bin/sh and /usr/bin.
{ salt ? "0", extra ? 0 }:
let
  mk = name: script: derivation {
    inherit name salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" script ];
  };
  dep = mk "edge-dep" ''
    mkdir -p $out/bin
    printf '#!/bin/sh\necho dep\n' > $out/bin/dep
    chmod +x $out/bin/dep
  '';
  tree = mk "edge-tree" ''
    mkdir -p $out && cd $out
    : > empty-file
    mkdir empty-dir
    printf '#!/bin/sh\necho hi\n' > exe && chmod 0755 exe
    printf 'abcdefgh' > eight-bytes
    printf 'abcdefghi' > nine-bytes
    ln -s exe relative-link
    ln -s ${dep}/bin/dep absolute-link
    ln -s ../nowhere/at/all dangling-link
    mkdir names && cd names
    # Byte order differs from locale order: B < Z < _ < a < aB < ab < e < z < é < ü…
    for n in B a _ Z z e é aB ab A a.b a-b '-dash' '~tilde' 'with space' 'ünïcødé' '日本'; do
      printf '%s' "$n" > "$n"
    done
    cd ..
    d=deep; i=0
    while [ $i -lt 120 ]; do d=$d/d$i; i=$((i+1)); done
    mkdir -p $d && echo bottom > $d/file
    seq 1 200000 > numbers
    echo ${dep} > dep-ref
    echo $out > self-ref
  '';
  single-file = mk "edge-single-file" ''
    echo 'a store path that is one file' > $out
  '';
  symlink = mk "edge-symlink" ''
    ln -s ${dep}/bin/dep $out
  '';
  text = builtins.toFile "edge-text-ca" "a content-addressed text file\n";
  source = builtins.path { path = ./fixture-src; name = "edge-source-ca"; };
  debug = mk "edge-debug" ''
    d=$out/lib/debug/.build-id
    mkdir -p $d/ab $d/cd $d/xx
    echo one > $d/ab/0123456789abcdef0123456789abcdef012345.debug
    echo two > $d/cd/00112233445566778899aabbccddeeff001122.debug
    echo not-indexed > $d/ab/notes.txt
    echo not-indexed > $d/xx/0123456789abcdef0123456789abcdef012345.debug
    ln -s ../cd/00112233445566778899aabbccddeeff001122.debug $d/ab/ffffffffffffffffffffffffffffffffffffff.debug
  '';
  # Optional bulk: paths of 4 MB of random bytes each, slow to compress.
  bulk = builtins.genList (i: mk "bulk-${toString i}" "head -c 4000000 /dev/urandom > $out") extra;
in mk "edge-top" ''
  mkdir -p $out
  for p in ${tree} ${single-file} ${symlink} ${text} ${source} ${debug} ${toString bulk}; do echo $p; done > $out/closure
''
