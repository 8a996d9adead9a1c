from services.ctl import main

main()
