from megaflamingo.cli.preprocess import main

raise SystemExit(main())
