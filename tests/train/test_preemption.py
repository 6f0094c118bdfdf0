"""The TPU maintenance notice: a metadata-server value other than NONE triggers the preemption path."""

import http.server
import threading

from emoqwen_jax.train.preemption import watch_maintenance_events


def test_maintenance_event_triggers_once():
    values = iter(["NONE", "NONE", "TERMINATE_ON_HOST_MAINTENANCE"])

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            assert self.headers["Metadata-Flavor"] == "Google"
            body = next(values, "TERMINATE_ON_HOST_MAINTENANCE").encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    seen, fired = [], threading.Event()
    thread = watch_maintenance_events(f"http://127.0.0.1:{server.server_port}/maintenance-event",
                                      on_event=lambda v: (seen.append(v), fired.set()), every_s=0.05)
    assert fired.wait(30)
    thread.join(5)
    server.shutdown()
    assert seen == ["TERMINATE_ON_HOST_MAINTENANCE"] and not thread.is_alive()
