"""The planner scripts' checks: each printed as it is made, the failures counted at the end."""


class Checks:
    def __init__(self, name):
        self.name, self.failures = name, []

    def __call__(self, ok, what):
        print(("ok: " if ok else "FAIL: ") + what)
        if not ok:
            self.failures.append(what)

    def exit_code(self):
        print(f"{self.name}: " + (f"{len(self.failures)} FAILED" if self.failures else "ok"))
        return 1 if self.failures else 0
