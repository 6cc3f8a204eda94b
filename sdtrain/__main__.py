from sdtrain.cli import main

raise SystemExit(main())
