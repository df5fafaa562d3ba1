from pacslab.cli import main

# Guarded: a process started with multiprocessing's "spawn" (the worker of `pacslab
# serve`) imports the parent's __main__ module again.
if __name__ == "__main__":
    raise SystemExit(main())
