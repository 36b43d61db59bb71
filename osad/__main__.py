from osad.cli import main

raise SystemExit(main())
