from megaflamingo.cli.convert import main

raise SystemExit(main())
