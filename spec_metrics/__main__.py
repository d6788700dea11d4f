from spec_metrics.ops.cli import main

raise SystemExit(main())
