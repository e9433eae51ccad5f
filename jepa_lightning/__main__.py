from jepa_lightning.main import cli_main

cli_main()
