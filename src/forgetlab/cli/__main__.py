from forgetlab.cli.main import main

main()
