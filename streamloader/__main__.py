from streamloader.cli import main

raise SystemExit(main())
