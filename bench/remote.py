"""bench/run --remote: pushing to a cache on another machine.

The receiver runs in a network namespace of its own, joined to this one by a veth pair (the
link): a throwaway sshd and `nixcache serve --upload-token-file` listen there. Over that link,
first at full speed, then limited to --link-rate by tc (a token bucket on the sender's side),
the same closure goes to an empty receiving directory four ways, each once per run:

- nixcache push --dest ssh://HOST/DIR (nixcache receive on the far side);
- nixcache push --dest http://HOST:PORT into serve --upload-token-file;
- a local nixcache push, then rsync -a of the directory over ssh (what users do today);
- nix copy --to http://HOST:PORT?secret-key=... into the same serve (Nix's own upload).

For each: wall time, the sender's CPU, and the bytes that crossed the link towards the
receiver (the veth's counter), against the bytes of the cache's files that arrived. Then the
no-op re-push of a closure of --many tiny paths over ssh.
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

NS = "nixcache-bench"
HOST_IF, PEER_IF = "ncb-send", "ncb-recv"
HOST_IP, PEER_IP = "10.77.0.1", "10.77.0.2"


def run(args, **kw):
    return subprocess.run(args, check=True, **kw)


def link_up():
    link_down()
    run(["ip", "netns", "add", NS])
    run(["ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", PEER_IF])
    run(["ip", "link", "set", PEER_IF, "netns", NS])
    run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF])
    run(["ip", "link", "set", HOST_IF, "up"])
    for cmd in (["ip", "addr", "add", f"{PEER_IP}/24", "dev", PEER_IF], ["ip", "link", "set", PEER_IF, "up"],
                ["ip", "link", "set", "lo", "up"]):
        run(["ip", "netns", "exec", NS] + cmd)


def link_down():
    subprocess.run(["ip", "link", "del", HOST_IF], stderr=subprocess.DEVNULL)
    subprocess.run(["ip", "netns", "del", NS], stderr=subprocess.DEVNULL)


def limit(rate):
    """Limits what the sender sends (and, for the acknowledgements, what it gets back) to `rate`
    (tc's units: 1mbps is 1 MB/s)."""
    for dev, ns in ((HOST_IF, []), (PEER_IF, ["ip", "netns", "exec", NS])):
        subprocess.run(ns + ["tc", "qdisc", "del", "dev", dev, "root"], stderr=subprocess.DEVNULL)
        if rate:
            run(ns + ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "32kb",
                      "latency", "400ms"])


def sent_bytes():
    with open(f"/sys/class/net/{HOST_IF}/statistics/tx_bytes") as f:
        return int(f.read())


def cache_bytes(d):
    total = 0
    for root, _, files in os.walk(d):
        if ".nixcache" in root:
            continue
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


class Receiver:
    """sshd in the namespace, with keys of its own; root logs in with the user key."""

    def __init__(self, work):
        self.dir = os.path.join(work, "ssh")
        os.makedirs(self.dir)
        for key in ("host_key", "user_key"):
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(self.dir, key)])
        shutil.copy(os.path.join(self.dir, "user_key.pub"), os.path.join(self.dir, "authorized_keys"))
        os.makedirs("/run/sshd", exist_ok=True)
        conf = os.path.join(self.dir, "sshd_config")
        with open(conf, "w") as f:
            f.write(f"Port 22\nListenAddress {PEER_IP}\nHostKey {self.dir}/host_key\n"
                    f"AuthorizedKeysFile {self.dir}/authorized_keys\nPidFile {self.dir}/sshd.pid\n"
                    "StrictModes no\nUsePAM no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n")
        self.sshd = subprocess.Popen(["ip", "netns", "exec", NS, "/usr/sbin/sshd", "-D", "-e", "-f", conf],
                                     stderr=subprocess.DEVNULL)
        with open(os.path.join(self.dir, "known_hosts"), "w") as f:
            f.write(f"{PEER_IP} " + open(os.path.join(self.dir, "host_key.pub")).read())
        self.opts = (f"-F /dev/null -i {self.dir}/user_key -o UserKnownHostsFile={self.dir}/known_hosts "
                     "-o BatchMode=yes -o LogLevel=ERROR")
        for _ in range(100):
            if subprocess.run(["ssh"] + self.opts.split() + [f"root@{PEER_IP}", "true"]).returncode == 0:
                return
            time.sleep(0.1)
        sys.exit("the benchmark's sshd did not start")

    def stop(self):
        self.sshd.kill()
        self.sshd.wait()


def serve(nixcache, d, tokens, public, port=5000):
    p = subprocess.Popen(["ip", "netns", "exec", NS, nixcache, "serve", "-q", "--dest", d, "--listen",
                          f"{PEER_IP}:{port}", "--upload-token-file", tokens, "--trusted-public-key", public],
                         stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if line.startswith("serving "):
            break
    # Its later lines (errors only, with -q) are drained so it never blocks on them.
    import threading
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    return p


def timed(args, env):
    """Runs args under GNU time: wall s, the sender's CPU s, peak RSS MiB, bytes sent."""
    with tempfile.NamedTemporaryFile("r") as t:
        before = sent_bytes()
        start = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-o", t.name, "-f", "%U %S %M"] + args, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        if p.returncode != 0:
            sys.stderr.write(p.stderr)
            p.check_returncode()
        user, sys_, rss = t.read().split()[-3:]
    return wall, float(user) + float(sys_), int(rss) / 1024, sent_bytes() - before


def bench_remote(a, work, nixcache, env, path, nar, many_nix):
    link_up()
    recv = None
    try:
        recv = Receiver(work)
        key = os.path.join(work, "bench.secret")
        run([nixcache, "keygen", "bench-1", key, key + ".pub"], stdout=subprocess.DEVNULL)
        public = open(key + ".pub").read().strip()
        tokens = os.path.join(work, "tokens")
        with open(tokens, "w") as f:
            f.write("bench-token\n")
        netrc = os.path.join(work, "netrc")
        with open(netrc, "w") as f:
            f.write(f"machine {PEER_IP} login nix password bench-token\n")
        env = dict(env, NIX_SSHOPTS=recv.opts)
        ssh = ["ssh"] + recv.opts.split()
        comp = a.remote_compression
        n = [0]

        def fresh():
            n[0] += 1
            return os.path.join(work, f"recv-{n[0]}")

        def ssh_push():
            d = fresh()
            return d, None, [nixcache, "push", "-q", "-c", comp, "-k", key, "--remote-program", nixcache,
                             "--dest", f"ssh://root@{PEER_IP}{d}", path], None

        def http_push():
            d = fresh()
            return d, serve(nixcache, d, tokens, public), [
                nixcache, "push", "-q", "-c", comp, "-k", key, "--upload-token-file", tokens,
                "--dest", f"http://{PEER_IP}:5000", path], None

        def rsync():
            d = fresh()
            local = d + "-local"
            return d, None, [nixcache, "push", "-q", "-c", comp, "-k", key, "--dest", local, path], [
                "rsync", "-a", "-e", " ".join(ssh), local + "/", f"root@{PEER_IP}:{d}/"]

        def nix_copy():
            d = fresh()
            q = f"compression={comp}&secret-key={key}" + ("&parallel-compression=true" if comp == "xz" else "")
            # Nix remembers what a cache URL had (its narinfo disk cache): a fresh one per run.
            return d, serve(nixcache, d, tokens, public), [
                "env", f"XDG_CACHE_HOME={d}-xdg", "nix", "copy", "--option", "netrc-file", netrc,
                "--to", f"http://{PEER_IP}:5000?{q}", path], None

        tools = [("nixcache ssh://", ssh_push), ("nixcache http://", http_push),
                 ("push + rsync over ssh", rsync), ("nix copy --to http://", nix_copy)]
        for rate, runs in (("", a.runs), (a.link_rate, a.link_runs)):
            if runs == 0:
                continue
            limit(rate)
            what = f"limited by tc to {rate} (tc: mbps is MB/s)" if rate else "at full speed (veth, no limit)"
            print()
            print(f"the closure ({nar / 2**20:.1f} MiB of NAR, {comp}) pushed to an empty cache on the far side of "
                  f"a veth link {what}; medians of {runs}:")
            print()
            print("| how | wall s | sender CPU s | sender peak RSS MiB | MiB sent over the link | / cache files |")
            print("|---|---:|---:|---:|---:|---:|")
            rows = {name: [] for name, _ in tools}
            for i in range(runs):
                order = tools if i % 2 == 0 else tools[::-1]
                for name, make in order:
                    d, server, cmd, then = make()
                    wall, cpu, rss, sent = timed(cmd, env)
                    if then:
                        w2, c2, _, s2 = timed(then, env)
                        wall, cpu, sent = wall + w2, cpu + c2, sent + s2
                    if server:
                        server.terminate()
                        server.wait()
                    files = cache_bytes(d)
                    rows[name].append((wall, cpu, rss, sent, sent / files))
                    print(f"  run {i + 1}, {name}: {wall:.2f} s, {sent / 2**20:.2f} MiB sent, "
                          f"{files / 2**20:.2f} MiB of cache files", file=sys.stderr)
                    shutil.rmtree(d, ignore_errors=True)
                    shutil.rmtree(d + "-local", ignore_errors=True)
                    shutil.rmtree(d + "-xdg", ignore_errors=True)
            med = lambda xs, k: statistics.median(x[k] for x in xs)
            for name, xs in rows.items():
                print(f"| {name} | {med(xs, 0):.2f} | {med(xs, 1):.2f} | {med(xs, 2):.0f} | "
                      f"{med(xs, 3) / 2**20:.2f} | {med(xs, 4):.3f}x |")
            base = rows["push + rsync over ssh"]
            for name in ("nixcache ssh://", "nixcache http://", "nix copy --to http://"):
                print(f"| {name} / push + rsync | {med(rows[name], 0) / med(base, 0):.2f}x | | | "
                      f"{med(rows[name], 3) / med(base, 3):.2f}x | |")
        limit("")
        if a.many:
            many = subprocess.run(["nix-instantiate", "--eval", "--read-write-mode", many_nix, "--arg", "n",
                                   str(a.many)], env=env, check=True, stdout=subprocess.PIPE,
                                  text=True).stdout.strip().strip('"')
            d = fresh()
            cmd = [nixcache, "push", "-q", "-c", "zstd", "-k", key, "--remote-program", nixcache,
                   "--dest", f"ssh://root@{PEER_IP}{d}", many]
            first = timed(cmd, env)
            again = [timed(cmd, env) for _ in range(a.runs)]
            print()
            print(f"a closure of {a.many + 1} tiny paths over ssh (zstd): first push {first[0]:.2f} s; "
                  f"no-op re-push {statistics.median(x[0] for x in again):.2f} s, "
                  f"{statistics.median(x[3] for x in again) / 2**10:.0f} KiB sent (median of {a.runs})")
    finally:
        limit("")
        if recv:
            recv.stop()
        link_down()
