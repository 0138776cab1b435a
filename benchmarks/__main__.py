import sys

if "--list-methods" in sys.argv[1:]:
    from benchmarks.listing import main
else:
    from benchmarks.cli import main

raise SystemExit(main())
