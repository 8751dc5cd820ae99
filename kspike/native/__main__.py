"""``python -m kspike.native``: compile (or find) the native SpikingRNN loops now.

Useful when building an image or preparing a machine, so that the first training run does not
wait for the compiler. Prints the compiled library's path, or why the loops are unavailable
(exit status 1).
"""
import sys

from kspike import native


def main():
    if native.load() is None:
        reason = native._state["error"] or "disabled by KSPIKE_NATIVE"
        print(f"kspike native loops unavailable: {reason}", file=sys.stderr)
        return 1
    print(f"kspike native loops ready: {native._state['library']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
