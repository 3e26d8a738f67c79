from benchmarks.gpu_check.cli import main

raise SystemExit(main())
