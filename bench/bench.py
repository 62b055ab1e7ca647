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

With --serve, only `nixcache serve` against nginx serving the same directory (wrk: narinfo
requests/s, NAR bytes/s; Nix's fetch of the closure; RSS idle, with 1,000 idle connections and
at peak); the lazy fill against a zstd push then a fetch, and how long a first request waits
for its closure to be filled with zstd and with xz.

Usage: bench/run [--scale medium] [--runs 3] [--compressions xz,zstd,none] [--many 10000]
                 [--files 200000] [--s3 xz,zstd]
       bench/run --serve [--scale medium] [--runs 3] [--serve-secs 5]
       bench/run --remote [--scale medium] [--runs 3] [--link-rate 1mbps] [--link-runs 1] [--many 10000]
"""
import argparse
import os
import re
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
HUGE_NIX = os.path.join(REPO, "bench", "huge.nix")
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


def run_case(path, comp, runs, work, repush=True):
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
            print(f"  run {i + 1}, {comp}, {name}: {wall:.2f} s wall, {cpu:.2f} s CPU, {rss:.0f} MiB", file=sys.stderr)
            if repush:
                repush[name].append(measure(cmd(d, path))[0])
            shutil.rmtree(d)
    return rows, repush


def measure_err(args, env):
    """Like measure, with extra environment; also returns stderr."""
    with tempfile.NamedTemporaryFile("r") as t:
        start = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-o", t.name, "-f", "%U %S %M"] + args, env=dict(ENV, **env),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        if p.returncode != 0:
            sys.stderr.write(p.stderr)
            p.check_returncode()
        user, sys_, rss = t.read().split()[-3:]
    return wall, float(user) + float(sys_), int(rss) / 1024, p.stderr


def cpu_of(pid):
    """CPU seconds (user + system) a process has used so far, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_s3(path, nar, a, work, many=None):
    """nixcache to a SeaweedFS bucket on loopback against the same push to a directory; with
    `many` (the closure of tiny paths), also its no-op re-push to each."""
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
        # Ready once the bucket itself answers a signed request (the S3 port answers before
        # weed has created the bucket).
        for _ in range(300):
            r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-I",
                                "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "benchAK:benchSK",
                                f"http://127.0.0.1:{base + 4}/bench"], stdout=subprocess.PIPE, text=True)
            if r.stdout.strip() == "200":
                break
            time.sleep(0.2)
        else:
            sys.exit("SeaweedFS did not start")
        # The narinfos a push keeps on this machine live in the run's directory, from empty.
        env = {"AWS_ACCESS_KEY_ID": "benchAK", "AWS_SECRET_ACCESS_KEY": "benchSK",
               "XDG_CACHE_HOME": os.path.join(work, "xdg-cache")}
        print()
        print(f"the closure ({nar / 2**20:.1f} MiB of NAR) pushed by nixcache to a SeaweedFS bucket on loopback "
              f"(weed mini) and to a directory, median of {a.runs}; requests from the push's summary:")
        print()
        print("| compression | to | wall s | CPU s | peak RSS MiB | MiB/s of NAR | requests |")
        print("|---|---|---:|---:|---:|---:|---|")
        for comp in a.s3.split(","):
            res = {"directory": [], "bucket": [], "curl": []}
            reqs = ""
            for i in range(a.runs):
                d = os.path.join(work, f"s3dir-{comp}-{i}")
                url = f"s3://bench/{comp}-{i}?endpoint=http://127.0.0.1:{base + 4}"
                for name, dest in [("directory", d), ("bucket", url)][:: -1 if i % 2 else 1]:
                    before = cpu_of(server.pid)
                    wall, cpu, rss, err = measure_err([NIXCACHE, "push", "-c", comp, "--dest", dest, path], env)
                    res[name].append((wall, cpu, rss, cpu_of(server.pid) - before))
                    if name == "bucket":
                        reqs = next((l for l in err.splitlines() if "request" in l), "")
                before = cpu_of(server.pid)
                wall = upload_with_curl(d, f"http://127.0.0.1:{base + 4}/bench/curl-{comp}-{i}")
                res["curl"].append((wall, cpu_of(server.pid) - before))
                shutil.rmtree(d)
            for name, xs in res.items():
                if name == "curl":
                    continue
                print(f"| {comp} | {name} | {med(xs, 0):.2f} | {med(xs, 1):.2f} | {med(xs, 2):.0f} | "
                      f"{nar / 2**20 / med(xs, 0):.0f} | {reqs if name == 'bucket' else ''} |")
            b, d = res["bucket"], res["directory"]
            print(f"| {comp} | bucket / directory | {med(b, 0) / med(d, 0):.2f}x | {med(b, 1) / med(d, 1):.2f}x | "
                  f"{med(b, 2) / med(d, 2):.2f}x | | extra wall time waiting on the server: "
                  f"{med(b, 0) - med(d, 0):.2f} s |")
            floor = (med(b, 1) + med(b, 3)) / os.cpu_count()
            print(f"| {comp} | the server's CPU | {med(b, 3):.2f} s per push | | | | the bound with it on the same "
                  f"{os.cpu_count()} cores: (push CPU + server CPU) / cores = {floor:.2f} s, "
                  f"{floor / med(d, 0):.2f}x the directory |")
            # The floor for any client: the server's CPU for storing these same files, sent by
            # curl, plus the directory push's CPU (the compressing and hashing every client
            # does), shared by the same cores.
            c = res["curl"]
            floor = (med(d, 1) + med(c, 1)) / os.cpu_count()
            print(f"| {comp} | the directory's files sent by curl, {os.cpu_count()} at a time | {med(c, 0):.2f} | | | | "
                  f"the server's CPU storing them: {med(c, 1):.2f} s; the floor for any client: (directory push CPU + "
                  f"that) / cores = {floor:.2f} s, **{floor / med(d, 0):.2f}x** the directory |")
        if many:
            comp = a.s3.split(",")[-1]
            n = len(sh(["nix-store", "--query", "--requisites", many]).split())
            print()
            print(f"the closure of {n} tiny paths ({comp}) pushed to the bucket and to a directory, then pushed "
                  f"again with everything present (re-push: median of {a.runs}):")
            print()
            print("| to | first push s | re-push s | re-push CPU s | re-push peak RSS MiB | re-push requests |")
            print("|---|---:|---:|---:|---:|---|")
            d = os.path.join(work, "s3-many-dir")
            url = f"s3://bench/many?endpoint=http://127.0.0.1:{base + 4}"
            # The bucket twice: with the narinfos kept here by the first push, and without them
            # (another machine, or --no-local-copies): every narinfo downloaded.
            for name, dest, extra in [("directory", d, []), ("bucket", url, []),
                                      ("bucket, --no-local-copies", url, ["--no-local-copies"])]:
                first = measure_err([NIXCACHE, "push", "-c", comp, "--dest", dest, many], env) if extra == [] else None
                again = [measure_err([NIXCACHE, "push", "-c", comp, *extra, "--dest", dest, many], env)
                         for _ in range(a.runs)]
                reqs = next((l for l in again[-1][3].splitlines() if "request" in l), "") if dest == url else ""
                print(f"| {name} | {f'{first[0]:.2f}' if first else ''} | {med(again, 0):.3f} | {med(again, 1):.2f} | "
                      f"{med(again, 2):.0f} | {reqs} |")
            # gc reads every narinfo: here it keeps them all (everything was pushed within the
            # day). NIXCACHE_BASELINE names another build of nixcache to time alongside.
            print()
            print(f"gc of those caches, keeping everything (`--older-than 1d`), median of {a.runs}:")
            print()
            print("| gc of | wall s | CPU s | peak RSS MiB | requests |")
            print("|---|---:|---:|---:|---|")
            gcs = [("directory", NIXCACHE, d, []), ("bucket", NIXCACHE, url, []),
                   ("bucket, --no-local-copies", NIXCACHE, url, ["--no-local-copies"])]
            if os.environ.get("NIXCACHE_BASELINE"):
                gcs.append(("bucket, NIXCACHE_BASELINE", os.environ["NIXCACHE_BASELINE"], url, []))
            for name, binary, dest, extra in gcs:
                runs = [measure_err([binary, "gc", "--older-than", "1d", *extra, "--dest", dest], env)
                        for _ in range(a.runs)]
                reqs = next((l for l in runs[-1][3].splitlines() if "request" in l), "") if dest == url else ""
                print(f"| {name} | {med(runs, 0):.3f} | {med(runs, 1):.2f} | {med(runs, 2):.0f} | {reqs} |")
            shutil.rmtree(d)
    finally:
        server.kill()
        server.wait()


def upload_with_curl(d, base_url):
    """PUTs every file under `d` to `base_url` with curl (SigV4, the bench key), as many at once
    as there are cores; the wall time."""
    files = sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)
    start = time.perf_counter()
    subprocess.run(["xargs", "-0", "-P", str(os.cpu_count()), "-I{}", "curl", "-sf", "-o", "/dev/null",
                    "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "benchAK:benchSK", "-T", "{}",
                    f"{base_url}/{{}}"], input="\0".join(files), cwd=d, check=True, text=True)
    return time.perf_counter() - start


def start_nginx(cache, port, work):
    """nginx serving `cache` with the example server block, as a cache's reference server."""
    d = os.path.join(work, f"nginx-{port}")
    os.makedirs(d)
    with open(os.path.join(REPO, "examples", "nginx", "nixcache.conf")) as f:
        server = (f.read().replace("listen 80;", f"listen 127.0.0.1:{port} backlog=4096;")
                  .replace("listen [::]:80;", "").replace("root /var/lib/static-nix-cache;", f"root {cache};"))
    with open(os.path.join(d, "server.conf"), "w") as f:
        f.write(server)
    with open(os.path.join(d, "nginx.conf"), "w") as f:
        f.write(f"user root;\ndaemon off;\nworker_processes auto;\nworker_rlimit_nofile 20000;\npid {d}/nginx.pid;\n"
                f"error_log {d}/error.log;\nevents {{ worker_connections 10000; }}\nhttp {{\naccess_log off;\n"
                f"sendfile on;\ntcp_nopush on;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n"
                f"fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n"
                f"include /etc/nginx/mime.types;\ninclude {d}/server.conf;\n}}\n")
    p = subprocess.Popen(["nginx", "-p", d, "-c", os.path.join(d, "nginx.conf")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return p


def start_serve(args, port):
    p = subprocess.Popen([NIXCACHE, "serve", "-q", "--listen", f"127.0.0.1:{port}", *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    wait_port(port)
    return p


def wait_port(port):
    import socket
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def wrk(url, conns, secs):
    """Requests/s and bytes/s wrk measured."""
    out = subprocess.run(["wrk", f"-t{min(2, conns)}", f"-c{conns}", f"-d{secs}s", "--latency", url], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    rps = float(next(l for l in out.splitlines() if l.startswith("Requests/sec:")).split()[1])
    tr = next(l for l in out.splitlines() if l.startswith("Transfer/sec:")).split()[1]
    units = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}
    m = re.match(r"[0-9.]+", tr)
    num, unit = float(m.group()), tr[m.end():]
    errors = next((l.strip() for l in out.splitlines() if "Non-2xx" in l or "Socket errors" in l), "")
    return rps, num * units[unit], errors


def rss(pid):
    """Current and peak RSS of a process, MiB."""
    with open(f"/proc/{pid}/status") as f:
        st = dict(l.split(":", 1) for l in f if ":" in l)
    return int(st["VmRSS"].split()[0]) / 1024, int(st["VmHWM"].split()[0]) / 1024


def nix_fetch(url, work, name, paths):
    """Wall time of Nix restoring `paths` from `url` into a fresh chroot store. The store is on
    tmpfs where there is one: a disk's writeback of the previous run's files made the same fetch
    take 0.5 s to 3.8 s here, which would measure the disk, not the server."""
    if os.path.isdir("/dev/shm"):
        work = tempfile.mkdtemp(dir="/dev/shm", prefix="nixcache-bench-")
    root = os.path.join(work, name)
    env = dict(ENV, XDG_CACHE_HOME=root + ".cache")
    start = time.perf_counter()
    r = subprocess.run(["nix", "copy", "--from", url, "--to", root, "--option", "require-sigs", "true",
                        "--option", "trusted-public-keys", open(KEY + ".pub").read().strip(), *paths], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"nix copy --from {url} failed:\n{r.stderr}")
    subprocess.run(["chmod", "-R", "u+w", root])
    shutil.rmtree(root)
    shutil.rmtree(root + ".cache", ignore_errors=True)
    if work.startswith("/dev/shm/"):
        os.rmdir(work)
    return wall


KEY = None


def bench_serve(path, closure, nar, a, work):
    """nixcache serve against nginx serving the same directory, and the lazy fill."""
    import socket
    global KEY
    KEY = os.path.join(work, "serve.secret")
    sh([NIXCACHE, "keygen", "bench-serve-1", KEY, KEY + ".pub"])
    cache = os.path.join(work, "served")
    sh([NIXCACHE, "push", "-q", "-c", "zstd", "-k", KEY, "--dest", cache, path])
    top = os.path.basename(path)[:32]
    nars = sorted((os.path.getsize(os.path.join(cache, "nar", n)), n) for n in os.listdir(os.path.join(cache, "nar")))
    big_size, big = nars[-1]
    ports = {"nginx": 24001, "nixcache serve": 24002}
    servers = {"nginx": start_nginx(cache, ports["nginx"], work),
               "nixcache serve": start_serve(["--dest", cache], ports["nixcache serve"])}
    print()
    print(f"nixcache serve against nginx (examples/nginx, sendfile, {os.cpu_count()} workers, access logs off on both) "
          f"serving the same directory: the {a.scale} closure pushed with zstd ({len(closure)} paths, "
          f"{nar / 2**20:.1f} MiB of NAR; the largest NAR file {big_size / 2**20:.1f} MiB); wrk on loopback, "
          f"{a.serve_secs} s each; the two servers alternate, medians of {a.runs} runs:")
    print()
    print("| server | narinfo req/s, 16 conns | NAR MiB/s, 1 conn | NAR MiB/s, 16 conns | nix copy of the closure s |")
    print("|---|---:|---:|---:|---:|")
    res = {name: [] for name in ports}
    errs = {name: set() for name in ports}
    try:
        # The two servers take turns, run by run, in alternating order, so that neither gets the
        # warmer page cache or the quieter minute.
        for i in range(a.runs):
            for name in (list(ports) if i % 2 == 0 else list(reversed(ports))):
                base = f"http://127.0.0.1:{ports[name]}"
                ni, _, e1 = wrk(f"{base}/{top}.narinfo", 16, a.serve_secs)
                _, b1, e2 = wrk(f"{base}/nar/{big}", 1, a.serve_secs)
                _, b16, e3 = wrk(f"{base}/nar/{big}", 16, a.serve_secs)
                fetch = nix_fetch(base, work, f"fetch-{ports[name]}-{i}", [path])
                res[name].append((ni, b1, b16, fetch))
                errs[name].update(e for e in (e1, e2, e3) if e)
        res = {name: tuple(statistics.median(r[k] for r in rs) for k in range(4)) for name, rs in res.items()}
        for name, (ni, b1, b16, fetch) in res.items():
            e = "; ".join(sorted(errs[name]))
            print(f"| {name} | {ni:.0f} | {b1 / 2**20:.0f} | {b16 / 2**20:.0f} | {fetch:.2f} |" + (f" {e}" if e else ""))
        n, c = res["nginx"], res["nixcache serve"]
        print(f"| nixcache / nginx | {c[0] / n[0]:.2f}x | {c[1] / n[1]:.2f}x | {c[2] / n[2]:.2f}x | {c[3] / n[3]:.2f}x |")
        # Memory: idle, with 1,000 idle connections open, and the peak over all of the above.
        pid = servers["nixcache serve"].pid
        idle, _ = rss(pid)
        conns = [socket.create_connection(("127.0.0.1", ports["nixcache serve"])) for _ in range(1000)]
        time.sleep(1)
        with_idle, peak = rss(pid)
        for c in conns:
            c.close()
        print()
        print(f"nixcache serve RSS: {idle:.1f} MiB idle after the load, {with_idle:.1f} MiB with 1,000 idle "
              f"connections open, {peak:.1f} MiB peak (under load included)")
    finally:
        for p in servers.values():
            p.terminate()  # nginx: SIGTERM stops its workers too; SIGKILL would orphan them
            p.wait()

    # Misses: a narinfo the cache lacks and the store does not have, from a lazy server (it
    # asks the Nix database) against the same 404 from a static one; and the threads of the
    # lazy server while 1,000 misses are asked at once.
    missing = "a" * 32
    statics, lazies, thr = [], [], []
    for i in range(a.runs):
        for kind in (("static", "lazy") if i % 2 == 0 else ("lazy", "static")):
            port = 24040 + i * 2 + (kind == "lazy")
            args = ["--dest", cache] + (["--from-store", "--roots", path, "-k", KEY] if kind == "lazy" else [])
            srv = start_serve(args, port)
            try:
                n, _, _ = wrk(f"http://127.0.0.1:{port}/{missing}.narinfo", 16, a.serve_secs)
                (statics if kind == "static" else lazies).append(n)
                if kind == "lazy":
                    socks = []
                    for j in range(1000):
                        s = socket.create_connection(("127.0.0.1", port))
                        h = f"{j:032d}".replace("0", "a")
                        s.sendall(f"GET /{h}.narinfo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                        socks.append(s)
                    with open(f"/proc/{srv.pid}/status") as f:
                        thr.append(int(next(l for l in f if l.startswith("Threads:")).split()[1]))
                    for s in socks:
                        s.recv(4096)
                        s.close()
            finally:
                srv.terminate()
                srv.wait()
    st, lz_ = statistics.median(statics), statistics.median(lazies)
    print()
    print(f"misses: a narinfo neither the cache nor the store has, 16 connections, {a.serve_secs} s, median of {a.runs}:")
    print()
    print("| server | 404 req/s |")
    print("|---|---:|")
    print(f"| static serve | {st:.0f} |")
    print(f"| lazy serve (asks the Nix database) | {lz_:.0f} |")
    print(f"| lazy / static | {lz_ / st:.2f}x |")
    print()
    print(f"lazy serve threads with 1,000 misses asked at once: {max(thr)} (-j {os.cpu_count()})")

    # Lazy: Nix fetches the closure from an empty --from-store cache, against pushing it with
    # zstd and then fetching it from nginx.
    lazy, pushed = [], []
    for i in range(a.runs):
        d = os.path.join(work, f"lazy-{i}")
        port = 24010 + i
        p = start_serve(["--dest", d, "--from-store", "--whole-store", "-k", KEY], port)
        try:
            lazy.append(nix_fetch(f"http://127.0.0.1:{port}", work, f"lazy-fetch-{i}", [path]))
        finally:
            p.terminate()
            p.wait()
        shutil.rmtree(d)
        d = os.path.join(work, f"pushed-{i}")
        start = time.perf_counter()
        sh([NIXCACHE, "push", "-q", "-c", "zstd", "-k", KEY, "--dest", d, path])
        push_s = time.perf_counter() - start
        port = 24020 + i
        ng = start_nginx(d, port, work)
        try:
            pushed.append((push_s, nix_fetch(f"http://127.0.0.1:{port}", work, f"pushed-fetch-{i}", [path])))
        finally:
            ng.terminate()
            ng.wait()
        shutil.rmtree(d)
    lz = statistics.median(lazy)
    ps = statistics.median(x[0] for x in pushed)
    pf = statistics.median(x[1] for x in pushed)
    print()
    print(f"lazy: Nix fetches the closure from an empty `serve --from-store` cache (zstd), against a zstd push "
          f"then a fetch from nginx, median of {a.runs}:")
    print()
    print("| case | s |")
    print("|---|---:|")
    print(f"| nix copy from the lazy server | {lz:.2f} |")
    print(f"| push -c zstd, then nix copy from nginx | {ps:.2f} + {pf:.2f} = {ps + pf:.2f} |")
    print(f"| lazy / push-then-fetch | {lz / (ps + pf):.2f}x |")

    # How long a first client waits: one request for a narinfo on an empty cache, which fills
    # the path's whole closure before it is answered; for the top path and for the largest path
    # alone, with zstd (serve's default) and xz.
    sizes = dict(zip(*[iter(sh(["nix", "path-info", "--size", *closure]).split())] * 2))
    largest = max(closure, key=lambda p: int(sizes[p]))
    cases = [("the top path (its closure)", path, nar),
             (f"the largest path ({os.path.basename(largest)[33:]})",
              largest, int(sh(["nix", "path-info", "-S", largest]).split()[1]))]
    print()
    print(f"first request alone on an empty `serve --from-store` cache: the narinfo's answer waits for the path's "
          f"closure to be filled; median of {a.runs}:")
    print()
    print("| narinfo asked | closure MiB of NAR | -c zstd s | zstd MiB/s | -c xz s | xz MiB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, p_, closure_nar in cases:
        row = []
        for comp in ("zstd", "xz"):
            ts = []
            for i in range(a.runs):
                d = os.path.join(work, f"first-{comp}-{i}")
                port = 24030 + i
                srv = start_serve(["--dest", d, "--from-store", "--whole-store", "-k", KEY, "-c", comp], port)
                try:
                    start = time.perf_counter()
                    subprocess.run(["curl", "-sf", "-o", "/dev/null",
                                    f"http://127.0.0.1:{port}/{os.path.basename(p_)[:32]}.narinfo"], check=True)
                    ts.append(time.perf_counter() - start)
                finally:
                    srv.terminate()
                    srv.wait()
                shutil.rmtree(d)
            t = statistics.median(ts)
            row += [f"{t:.2f}", f"{closure_nar / 2**20 / t:.0f}"]
        print(f"| {label} | {closure_nar / 2**20:.1f} | " + " | ".join(row) + " |")


def bench_partial(path, closure, nar, a, work):
    """A partial cache: the closure's dependencies as if an upstream (cache.nixos.org) had
    them, the top path built here; what --skip-signed-by and --skip-upstream save."""
    key = os.path.join(work, "upstream.secret")
    sh([NIXCACHE, "keygen", "upstream-1", key, key + ".pub"])
    public = open(key + ".pub").read().strip()
    deps = [p for p in closure if p != path]
    upstream = os.path.join(work, "upstream")
    sh([NIXCACHE, "push", "-q", "-c", "zstd", "--dest", upstream] + deps)
    # What substituting them from the upstream leaves in the database: its signature.
    subprocess.run(["nix", "store", "sign", "--key-file", key] + deps, env=ENV, check=True, stderr=subprocess.DEVNULL)
    out = sh(["nix", "path-info", "--size"] + closure).split()
    sizes = {os.path.basename(p)[:32]: int(n) for p, n in zip(out[0::2], out[1::2])}
    port = 24101
    nginx = start_nginx(upstream, port, work)
    cases = {
        "whole closure": [],
        "--skip-signed-by upstream-1": ["--skip-signed-by", public],
        "--skip-upstream http://127.0.0.1 (nginx)": ["--skip-upstream", f"http://127.0.0.1:{port}"],
    }
    res = {name: [] for name in cases}
    try:
        for i in range(a.runs):
            for name, flags in (list(cases.items()) if i % 2 == 0 else list(reversed(cases.items()))):
                d = os.path.join(work, f"partial-{i}-{len(flags)}-{flags[-1][-4:] if flags else 'all'}")
                wall, _, _, err = measure_err([NIXCACHE, "push", "-c", "zstd", "--dest", d] + flags + [path], {})
                here = {f[:32] for f in os.listdir(d) if f.endswith(".narinfo")}
                skipped_nar = sum(n for h, n in sizes.items() if h not in here)
                asked = [line for line in err.splitlines() if line.startswith("asked ")]
                res[name].append((wall, len(here), size(d), asked[0] if asked else "", skipped_nar))
                shutil.rmtree(d)
    finally:
        nginx.terminate()
        nginx.wait()
    print()
    print(f"a partial cache: the {a.scale} closure ({len(closure)} paths, {nar / 2**20:.1f} MiB of NAR) with its "
          f"{len(deps)} dependencies signed by upstream-1 in the database and in an upstream cache served by nginx, "
          f"the top path built here; pushed with zstd to an empty directory, median of {a.runs}:")
    print()
    print("| push | paths pushed | paths skipped | NAR MiB skipped | cache MiB | wall s | upstream lookups |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, rs in res.items():
        pushed = statistics.median(r[1] for r in rs)
        print(f"| {name} | {pushed:.0f} | {len(closure) - pushed:.0f} | {statistics.median(r[4] for r in rs) / 2**20:.1f} "
              f"| {statistics.median(r[2] for r in rs) / 2**20:.2f} | {statistics.median(r[0] for r in rs):.2f} | {rs[0][3]} |")


def sha256_of_files(path):
    """Seconds to read and SHA-256 every regular file under path, in 4 MiB pieces."""
    import hashlib
    start = time.perf_counter()
    h = hashlib.sha256()
    for root, _, files in os.walk(path):
        for f in sorted(files):
            p = os.path.join(root, f)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as fh:
                    while chunk := fh.read(4 << 20):
                        h.update(chunk)
    return time.perf_counter() - start


def bench_huge(a, work):
    """One path where a single NAR dominates, against nix copy, with the floor: the NAR's
    SHA-256 alone, which no pipeline can beat (NarHash is one serial hash)."""
    path = sh(["nix-build", HUGE_NIX, "--no-out-link", "--arg", "gib", str(a.huge_gib)])
    nar = int(sh(["nix", "path-info", "--size", path]).split()[1])
    print()
    print(f"one path of {nar / 2**30:.2f} GiB of NAR ({a.huge_gib} GiB sparse file + 50 MB random), "
          f"{os.cpu_count()} cores, median of {a.runs}:")
    print()
    print("| compression | tool | wall s | CPU s | peak RSS MiB | output MiB |")
    print("|---|---|---:|---:|---:|---:|")
    ratios = []
    rows_by = {}
    for comp in a.huge.split(","):
        rows, _ = run_case(path, comp, a.runs, work, repush=False)
        for name, xs in rows.items():
            print(f"| {comp} | {name} | {med(xs, 0):.2f} | {med(xs, 1):.2f} | {med(xs, 2):.0f} | {med(xs, 3) / 2**20:.2f} |")
        ratios.append((comp, med(rows["nixcache"], 0) / med(rows["nix copy"], 0)))
        rows_by[comp] = rows
    # The compressor alone on the same NAR: xz's own multithreaded mode cuts the same 24 MiB
    # blocks and does the same LZMA2 work, with no hashing; the NAR comes through a pipe.
    xz_floor = None
    if "xz" in a.huge.split(","):
        pipe = f"nix-store --dump {path} | xz -T{os.cpu_count()} -6 -c > /dev/null"
        runs = [measure(["sh", "-c", pipe]) for _ in range(a.runs)]
        xz_floor = (med(runs, 0), med(runs, 1), pipe)
    floor = statistics.median(sha256_of_files(path) for _ in range(a.runs))
    import hashlib
    buf = bytes(1 << 28)
    start = time.perf_counter()
    h = hashlib.sha256()
    for _ in range(4):
        h.update(buf)
    in_memory = (time.perf_counter() - start) * nar / (1 << 30)
    print()
    for comp, r in ratios:
        print(f"{comp}: nixcache / nix copy wall {r:.2f}x")
    print(f"the floor: SHA-256 of the path's file bytes alone, read and hashed on one core (Python's hashlib, "
          f"OpenSSL, SHA-NI where the CPU has it): {floor:.2f} s; hashing {nar / 2**30:.2f} GiB already in memory: "
          f"{in_memory:.2f} s. Every tool must hash the whole NAR once, serially (NarHash)")
    if xz_floor:
        wall, cpu, pipe = xz_floor
        nix = med(rows_by["xz"]["nix copy"], 0)
        print(f"the xz floor: `{pipe}` (the same blocks, the same LZMA2 work, no hashing): {wall:.2f} s wall "
              f"({wall / nix:.2f}x nix copy), {cpu:.2f} s CPU")


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
    ap.add_argument("--serve", action="store_true", help="only nixcache serve against nginx, and the lazy fill")
    ap.add_argument("--serve-secs", type=int, default=5, help="seconds of each wrk load")
    ap.add_argument("--huge", default="", help="only one huge path, with these compressions (zstd,xz)")
    ap.add_argument("--huge-gib", type=int, default=5, help="GiB of sparse file in the huge path")
    ap.add_argument("--remote", action="store_true",
                    help="only pushes to another machine: over ssh, over http, push + rsync, nix copy --to http "
                         "(a network namespace on the far side of a veth link, then that link limited by tc)")
    ap.add_argument("--remote-compression", default="xz", help="with --remote: the compression")
    ap.add_argument("--link-rate", default="1mbps", help="with --remote: the limited link's rate (tc's units: mbps is MB/s)")
    ap.add_argument("--link-runs", type=int, default=1, help="with --remote: runs over the limited link")
    ap.add_argument("--partial", action="store_true",
                    help="only partial caches: what --skip-signed-by and --skip-upstream leave out "
                         "(signs the closure's dependencies in the Nix database with a throwaway key)")
    a = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "--locked", "-q"], cwd=REPO, check=True)
    path = sh(["nix-build", CLOSURE_NIX, "--no-out-link", "--arg", "scale", f'"{a.scale}"'])
    closure = sh(["nix-store", "--query", "--requisites", path]).split()
    nar = sum(int(x) for x in sh(["nix", "path-info", "--size"] + closure).split()[1::2])
    print(f"closure: {a.scale}, {len(closure)} paths, {nar / 2**20:.1f} MiB of NAR; {os.cpu_count()} cores; "
          f"{a.runs} runs each, medians; {sh(['nix-store', '--version'])}")
    if a.serve:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as work:
            bench_serve(path, closure, nar, a, work)
        return
    if a.huge:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as work:
            bench_huge(a, work)
        return
    if a.remote:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from remote import bench_remote
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as work:
            bench_remote(a, work, NIXCACHE, ENV, path, nar, MANY_NIX)
        return
    if a.partial:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as work:
            bench_partial(path, closure, nar, a, work)
        return
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
            files_nar = int(sh(["nix", "path-info", "--size", files]).split()[1])
            print()
            print(f"one path of {a.files} small files, {files_nar / 2**20:.1f} MiB of NAR, xz (nix copy with "
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
            bench_s3(path, nar, a, work, many if a.many else None)
    print()
    print("Ratios are nixcache / nix copy: below 1.00x is better for nixcache.")


if __name__ == "__main__":
    sys.exit(main())
