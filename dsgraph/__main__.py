from dsgraph.cli import main

raise SystemExit(main())
