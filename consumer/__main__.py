from consumer.app import main

main()
