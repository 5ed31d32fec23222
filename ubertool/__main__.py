from ubertool.runtime.cli import main

main()
