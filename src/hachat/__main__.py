from hachat.cli import main

raise SystemExit(main())
