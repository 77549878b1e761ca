from ctpo.cli import main

raise SystemExit(main())
