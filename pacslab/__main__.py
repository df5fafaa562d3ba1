from pacslab.cli import main

raise SystemExit(main())
