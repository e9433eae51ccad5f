"""``python -m data_modules.lidc --root DIR ...``: build the LIDC-IDRI nodule cohort."""

from data_modules.lidc.cohort import main

main()
