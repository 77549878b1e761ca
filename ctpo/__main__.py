from ctpo.cli import main

# guarded: vLLM's CPU backend and the sandbox start worker processes with `spawn`, which re-imports
# the parent's __main__ module in each child
if __name__ == "__main__":
    raise SystemExit(main())
