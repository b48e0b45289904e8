from sessionmgr.cli import main

raise SystemExit(main())
