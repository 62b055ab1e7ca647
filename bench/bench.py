#!/usr/bin/env python3
"""nixcache against `nix copy --to file://` on the same closures, in one run.

Builds the closure(s), then for each compression runs both tools into fresh directories,
alternating which goes first, several times, and prints wall time, CPU time, peak RSS and
output bytes (medians) with the ratios nixcache / nix copy. Also times a re-push where
everything is present, on the closure; and on a closure of 10,001 tiny paths, a first push
and a re-push with each compression, and signing all its narinfos (`nix store sign`); and
one path of 200,000 small files (several xz blocks) pushed with xz against Nix's parallel
compression. With --s3 (xz,zstd by default), the closure pushed by nixcache to a SeaweedFS
bucket on loopback against the same push to a directory: wall, CPU, peak RSS and the requests
made (Nix 2.8 cannot write to a bucket, so it is no peer here).

Usage: bench/run [--scale medium] [--runs 3] [--compressions xz,zstd,none] [--many 10000]
                 [--files 200000] [--s3 xz,zstd]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOSURE_NIX = os.path.join(REPO, "..", "shared", "bench", "closure.nix")
MANY_NIX = os.path.join(REPO, "bench", "many.nix")
FILES_NIX = os.path.join(REPO, "bench", "files.nix")
NIXCACHE = os.path.join(REPO, "target", "release", "nixcache")
ENV = dict(os.environ, NIX_CONFIG="substituters =\nexperimental-features = nix-command\n")


def sh(args, **kw):
    return subprocess.run(args, env=ENV, check=True, stdout=subprocess.PIPE, text=True, **kw).stdout.strip()


def measure(args):
    """Runs args under GNU time; returns wall s, CPU s (user + system), peak RSS MiB."""
    with tempfile.NamedTemporaryFile("r") as t:
        start = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-o", t.name, "-f", "%U %S %M"] + args, env=ENV, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        user, sys_, rss = t.read().split()[-3:]
    return wall, float(user) + float(sys_), int(rss) / 1024


def size(d):
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            if not f.startswith(".nixcache"):
                total += os.path.getsize(os.path.join(root, f))
    return total


def nix_url(d, comp):
    q = f"compression={comp}"
    if comp == "xz":
        q += "&parallel-compression=true"
    return f"file://{d}?{q}"


def tools(comp):
    return {
        "nix copy": lambda d, p: ["nix", "copy", "--to", nix_url(d, comp), p],
        "nixcache": lambda d, p: [NIXCACHE, "push", "-q", "-c", comp, "--dest", d, p],
    }


def run_case(path, comp, runs, work):
    rows = {name: [] for name in tools(comp)}
    repush = {name: [] for name in tools(comp)}
    for i in range(runs):
        order = list(tools(comp).items())
        if i % 2:
            order.reverse()
        for name, cmd in order:
            d = os.path.join(work, f"{comp}-{name.replace(' ', '-')}-{i}")
            wall, cpu, rss = measure(cmd(d, path))
            rows[name].append((wall, cpu, rss, size(d)))
            repush[name].append(measure(cmd(d, path))[0])
            shutil.rmtree(d)
    return rows, repush


def measure_err(args, env):
    """Like measure, with extra environment; also returns stderr."""
    with tempfile.NamedTemporaryFile("r") as t:
        start = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-o", t.name, "-f", "%U %S %M"] + args, env=dict(ENV, **env),
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        user, sys_, rss = t.read().split()[-3:]
    return wall, float(user) + float(sys_), int(rss) / 1024, p.stderr


def bench_s3(path, nar, a, work):
    """nixcache to a SeaweedFS bucket on loopback against the same push to a directory."""
    weed = "/opt/nixcache-weed/bin/weed"
    base = 23000
    data = os.path.join(work, "weed")
    os.makedirs(data)
    conf = os.path.join(work, "s3.json")
    with open(conf, "w") as f:
        f.write('{"identities":[{"name":"admin","credentials":[{"accessKey":"benchAK","secretKey":"benchSK"}],'
                '"actions":["Admin","Read","Write","List","Tagging"]}]}')
    ports = []
    for k, name in enumerate(["master", "volume", "filer", "s3", "admin"], start=1):
        ports += [f"-{name}.port={base + k}", f"-{name}.port.grpc={base + k + 10000}"]
    server = subprocess.Popen([weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *ports,
                               "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                               f"-s3.config={conf}", "-bucket=bench"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            r = subprocess.run(["curl", "-s", f"http://127.0.0.1:{base + 4}/bench/x"], stdout=subprocess.PIPE, text=True)
            if "AccessDenied" in r.stdout or "NoSuchKey" in r.stdout:
                break
            time.sleep(0.2)
        env = {"AWS_ACCESS_KEY_ID": "benchAK", "AWS_SECRET_ACCESS_KEY": "benchSK"}
        print()
        print(f"the closure ({nar / 2**20:.1f} MiB of NAR) pushed by nixcache to a SeaweedFS bucket on loopback "
              f"(weed mini) and to a directory, median of {a.runs}; requests from the push's summary:")
        print()
        print("| compression | to | wall s | CPU s | peak RSS MiB | MiB/s of NAR | requests |")
        print("|---|---|---:|---:|---:|---:|---|")
        for comp in a.s3.split(","):
            res = {"directory": [], "bucket": []}
            reqs = ""
            for i in range(a.runs):
                d = os.path.join(work, f"s3dir-{comp}-{i}")
                url = f"s3://bench/{comp}-{i}?endpoint=http://127.0.0.1:{base + 4}"
                for name, dest in [("directory", d), ("bucket", url)][:: -1 if i % 2 else 1]:
                    wall, cpu, rss, err = measure_err([NIXCACHE, "push", "-c", comp, "--dest", dest, path], env)
                    res[name].append((wall, cpu, rss))
                    if name == "bucket":
                        reqs = next((l for l in err.splitlines() if "request" in l), "")
                shutil.rmtree(d)
            for name, xs in res.items():
                print(f"| {comp} | {name} | {med(xs, 0):.2f} | {med(xs, 1):.2f} | {med(xs, 2):.0f} | "
                      f"{nar / 2**20 / med(xs, 0):.0f} | {reqs if name == 'bucket' else ''} |")
            b, d = res["bucket"], res["directory"]
            print(f"| {comp} | bucket / directory | {med(b, 0) / med(d, 0):.2f}x | {med(b, 1) / med(d, 1):.2f}x | "
                  f"{med(b, 2) / med(d, 2):.2f}x | | extra wall time waiting on the server: "
                  f"{med(b, 0) - med(d, 0):.2f} s |")
    finally:
        server.kill()
        server.wait()


def med(xs, k):
    return statistics.median(x[k] for x in xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="medium")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compressions", default="xz,zstd,none")
    ap.add_argument("--many", type=int, default=10000, help="paths in the re-push fixture (0: skip)")
    ap.add_argument("--files", type=int, default=200000, help="files in the many-files path (0: skip)")
    ap.add_argument("--s3", default="xz,zstd", help="compressions pushed to a SeaweedFS bucket ('': skip)")
    a = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "--locked", "-q"], cwd=REPO, check=True)
    path = sh(["nix-build", CLOSURE_NIX, "--no-out-link", "--arg", "scale", f'"{a.scale}"'])
    closure = sh(["nix-store", "--query", "--requisites", path]).split()
    nar = sum(int(x) for x in sh(["nix", "path-info", "--size"] + closure).split()[1::2])
    print(f"closure: {a.scale}, {len(closure)} paths, {nar / 2**20:.1f} MiB of NAR; {os.cpu_count()} cores; "
          f"{a.runs} runs each, medians; {sh(['nix-store', '--version'])}")
    print()
    print("| compression | tool | wall s | CPU s | peak RSS MiB | output MiB | re-push s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    ratios = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as work:
        for comp in a.compressions.split(","):
            rows, repush = run_case(path, comp, a.runs, work)
            for name, xs in rows.items():
                print(f"| {comp} | {name} | {med(xs, 0):.2f} | {med(xs, 1):.2f} | {med(xs, 2):.0f} | "
                      f"{med(xs, 3) / 2**20:.2f} | {statistics.median(repush[name]):.3f} |")
            n, c = rows["nix copy"], rows["nixcache"]
            ratios.append((comp, med(c, 0) / med(n, 0), med(c, 1) / med(n, 1), med(c, 2) / med(n, 2),
                           med(c, 3) / med(n, 3), statistics.median(repush["nixcache"]) / statistics.median(repush["nix copy"])))
        print()
        print("| compression | wall | CPU | peak RSS | output bytes | re-push |")
        print("|---|---:|---:|---:|---:|---:|")
        for comp, *r in ratios:
            print(f"| {comp} | " + " | ".join(f"{x:.2f}x" for x in r) + " |")
        if a.many:
            many = sh(["nix-instantiate", "--eval", "--read-write-mode", MANY_NIX, "--arg", "n", str(a.many)]).strip('"')
            print()
            print(f"a closure of {a.many + 1} tiny paths: first push into an empty directory, then re-push "
                  f"with everything present (median of {a.runs}):")
            print()
            print("| compression | tool | first push s | CPU s | peak RSS MiB | re-push s |")
            print("|---|---|---:|---:|---:|---:|")
            many_ratios = []
            for k, comp in enumerate(a.compressions.split(",")):
                order = list(tools(comp).items())
                if k % 2:
                    order.reverse()
                res = {}
                for name, cmd in order:
                    # Kept until the end: deleting 20,000 files just before the other tool's
                    # first push would slow its file creation (ext4 skips recently freed inodes).
                    d = os.path.join(work, f"many-{comp}-{name.replace(' ', '-')}")
                    first = measure(cmd(d, many))
                    again = statistics.median(measure(cmd(d, many))[0] for _ in range(a.runs))
                    res[name] = (first, again)
                    print(f"| {comp} | {name} | {first[0]:.2f} | {first[1]:.2f} | {first[2]:.0f} | {again:.3f} |")
                (fc, rc), (fn, rn) = res["nixcache"], res["nix copy"]
                many_ratios.append((comp, fc[0] / fn[0], fc[2] / fn[2], rc / rn))
            print()
            print("| compression | first push wall | peak RSS | re-push |")
            print("|---|---:|---:|---:|")
            for comp, *r in many_ratios:
                print(f"| {comp} | " + " | ".join(f"{x:.2f}x" for x in r) + " |")
            # Key rotation: sign every narinfo of an unsigned cache of the tiny paths.
            comp = a.compressions.split(",")[0]
            unsigned = os.path.join(work, f"many-{comp}-nixcache")
            key = os.path.join(work, "bench.secret")
            sh([NIXCACHE, "keygen", "bench-1", key, key + ".pub"])
            signers = {
                "nix store sign": lambda d: ["nix", "store", "sign", "--store", f"file://{d}", "--key-file", key,
                                             "-r", many],
                "nixcache sign": lambda d: [NIXCACHE, "sign", "-q", "-k", key, "--dest", d],
            }
            signs = {name: [] for name in signers}
            for i in range(a.runs):
                order = list(signers.items())
                if i % 2:
                    order.reverse()
                for name, cmd in order:
                    d = os.path.join(work, "sign")
                    shutil.copytree(unsigned, d, symlinks=True)
                    signs[name].append(measure(cmd(d)))
                    shutil.rmtree(d)
            print()
            print(f"signing the {a.many + 1} narinfos of that cache ({comp}, unsigned), median of {a.runs}:")
            print()
            print("| tool | wall s | CPU s | peak RSS MiB |")
            print("|---|---:|---:|---:|")
            for name, xs in signs.items():
                print(f"| {name} | {med(xs, 0):.2f} | {med(xs, 1):.2f} | {med(xs, 2):.0f} |")
            n, c = signs["nix store sign"], signs["nixcache sign"]
            print(f"| ratio | {med(c, 0) / med(n, 0):.2f}x | {med(c, 1) / med(n, 1):.2f}x | {med(c, 2) / med(n, 2):.2f}x |")
        if a.files:
            files = sh(["nix-build", FILES_NIX, "--no-out-link", "--arg", "n", str(a.files)])
            nar = int(sh(["nix", "path-info", "--size", files]).split()[1])
            print()
            print(f"one path of {a.files} small files, {nar / 2**20:.1f} MiB of NAR, xz (nix copy with "
                  f"parallel-compression), median of {a.runs}:")
            print()
            rows, _ = run_case(files, "xz", a.runs, work)
            print("| tool | wall s | CPU s | peak RSS MiB | output MiB |")
            print("|---|---:|---:|---:|---:|")
            for name, xs in rows.items():
                print(f"| {name} | {med(xs, 0):.2f} | {med(xs, 1):.2f} | {med(xs, 2):.0f} | {med(xs, 3) / 2**20:.2f} |")
            n, c = rows["nix copy"], rows["nixcache"]
            print(f"| ratio | {med(c, 0) / med(n, 0):.2f}x | {med(c, 1) / med(n, 1):.2f}x | "
                  f"{med(c, 2) / med(n, 2):.2f}x | {med(c, 3) / med(n, 3):.2f}x |")
        if a.s3:
            bench_s3(path, nar, a, work)
    print()
    print("Ratios are nixcache / nix copy: below 1.00x is better for nixcache.")


if __name__ == "__main__":
    sys.exit(main())
