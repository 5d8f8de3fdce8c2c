#!/usr/bin/python3
"""bench/metrics_delta.py against a /metrics page that changes while its command runs: the mean
of what each grown series observed during the command, nothing for the others, refusals.

Usage: metrics_delta_check.py
"""
import http.server
import os
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(HERE, "..", "..", "bench", "metrics_delta.py")


def page(step_sum, step_count, attention_sum, attention_count, requests):
    return f"""# TYPE moemesh_step_seconds histogram
moemesh_step_seconds_bucket{{le="+Inf"}} {step_count}
moemesh_step_seconds_sum {step_sum}
moemesh_step_seconds_count {step_count}
# TYPE moemesh_phase_seconds histogram
moemesh_phase_seconds_sum{{phase="attention"}} {attention_sum}
moemesh_phase_seconds_count{{phase="attention"}} {attention_count}
moemesh_phase_seconds_sum{{phase="lookup"}} 0.25
moemesh_phase_seconds_count{{phase="lookup"}} 5
# TYPE moemesh_requests_total counter
moemesh_requests_total {requests}
"""


# Before and after the command. step: 2 observations summing 1 s, then 5 summing 4 s (3 during
# the command, 3 s: a mean of 1000 ms). phase: two label sets, one of them idle. requests_total
# is not a histogram of seconds.
PAGES = [page(1, 2, 0.5, 10, 7), page(4, 5, 0.51, 14, 9)]


class Page(http.server.BaseHTTPRequestHandler):
    shown = 0

    def do_GET(self):
        if self.path == "/advance":  # what the measured command does: the next scrape sees page 2
            Page.shown = 1
            body = b"ok"
        else:
            body = PAGES[Page.shown].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def check(ok, what):
    print(("ok: " if ok else "FAIL: ") + what)
    if not ok:
        sys.exit(1)


def main():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    advance = [sys.executable, "-c", f"import urllib.request; urllib.request.urlopen('{url}/advance').read()"]
    r = subprocess.run([sys.executable, TOOL, "--metrics", f"router={url}/metrics", "--"] + advance,
                       capture_output=True, text=True, timeout=60)
    check(r.returncode == 0, "runs: " + r.stderr.strip())
    lines = r.stdout.splitlines()
    check(any("router" in l and "moemesh_step_seconds " in l and "mean 1000.000 ms  x 3" in l for l in lines),
          "a grown series: its mean over the command (3 s over 3 observations): " + r.stdout)
    check(any('{phase="attention"}' in l and "mean 2.500 ms  x 4" in l for l in lines),
          "a labelled series apart from its siblings (10 ms over 4): " + r.stdout)
    check(not any("lookup" in l for l in lines), "a series that saw nothing during the command is left out")
    check(not any("requests_total" in l for l in lines), "only histograms of seconds")

    Page.shown = 0
    r = subprocess.run([sys.executable, TOOL, "--metrics", f"router={url}/metrics", "--", sys.executable, "-c",
                        "raise SystemExit(3)"], capture_output=True, text=True, timeout=60)
    check(r.returncode == 3 and "exited with 3" in r.stderr, "a failed command's exit status is passed on: " + r.stderr)
    r = subprocess.run([sys.executable, TOOL, "--metrics", url, "--", "true"], capture_output=True, text=True,
                       timeout=60)
    check(r.returncode != 0 and "NAME=URL" in r.stderr, "a --metrics without its name is refused: " + r.stderr)
    server.shutdown()
    print("metrics_delta: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
