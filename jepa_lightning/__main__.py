from jepa_lightning.main import main

main()
