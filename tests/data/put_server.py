"""A plain HTTP server that takes Nix's uploads (PUT writes the file, GET and HEAD read it) and
knows nothing of nixcache: what `push --dest http://` falls back to path-by-path lookups for.

Usage: python3 put_server.py DIR  (prints the port it listens on, on 127.0.0.1)
"""
import http.server
import os
import sys

ROOT = os.path.abspath(sys.argv[1])


class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **kw):
        super().__init__(*a, directory=ROOT, **kw)

    def log_message(self, *a):
        pass

    def do_PUT(self):
        rel = self.path.lstrip("/")
        if ".." in rel.split("/"):
            self.send_error(403)
            return
        dest = os.path.join(ROOT, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        n = int(self.headers.get("Content-Length", "0"))
        with open(dest + ".part", "wb") as f:
            while n > 0:
                chunk = self.rfile.read(min(n, 1 << 20))
                if not chunk:
                    break
                f.write(chunk)
                n -= len(chunk)
        os.rename(dest + ".part", dest)
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
