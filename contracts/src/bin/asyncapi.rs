//! Prints the AsyncAPI document of the messages:
//! `cargo run -p contracts --features asyncapi --bin asyncapi > contracts/asyncapi.json`

fn main() {
    print!("{}", contracts::asyncapi::document_json());
}
