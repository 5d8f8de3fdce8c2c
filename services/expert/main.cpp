int main() { return 0; }  // placeholder until the expert service lands
