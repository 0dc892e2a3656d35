from fingrpo.cli import main

raise SystemExit(main())
