# A closure of n+1 tiny store paths, made at evaluation time (no builds):
#   nix-instantiate --eval bench/many.nix --arg n 10000
{ n ? 10000 }:
let paths = builtins.genList (i: builtins.toFile "many-${toString i}" "file ${toString i}\n") n;
in builtins.toFile "many-top" (builtins.concatStringsSep "\n" paths + "\n")
