"""An in-process stand-in for the Hub HTTP API that records every request (for publish tests).

It answers the calls HfApi.create_repo / create_branch / create_commit make: repo creation, branch
creation, the model card's YAML check, the pre-upload check (every file answered "regular", so contents travel inline in the
commit) and the NDJSON commit. Any other route gets a 404 so an unexpected call shows up in a test.
"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.requests: list[tuple[str, str, bytes]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(("POST", self.path, body))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "repos", "create"]:
                    name = json.loads(body)
                    return self._json({"url": f"{hub.url}/{name.get('organization')}/{name['name']}"})
                if parts[:2] == ["api", "models"] and "preupload" in parts:
                    files = json.loads(body)["files"]
                    return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                 for f in files]})
                if parts[:2] == ["api", "models"] and "commit" in parts:
                    repo = "/".join(parts[2:4])
                    return self._json({"commitUrl": f"{hub.url}/{repo}/commit/{'c' * 40}", "commitOid": "c" * 40})
                if parts[:2] == ["api", "validate-yaml"]:
                    return self._json({"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and "branch" in parts:
                    return self._json({})
                self._json({"error": "unknown route"}, 404)

            def do_GET(self):
                hub.requests.append(("GET", self.path, b""))
                self._json({"error": "unknown route"}, 404)

            def _json(self, obj, status=200):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
